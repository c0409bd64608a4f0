// Live updates: the server says "changed" (at most once a second); the page fetches
// itself again and swaps its <main>.  Never while the operator is typing in a form, and
// never on pages that hold a decision (previews, results, sign-in: data-live="off").
(() => {
  "use strict";
  const live = document.getElementById("live");
  let busy = false;
  let again = false;

  function typing() {
    const el = document.activeElement;
    return !!(el && el.closest("form") && el.matches("input, select, textarea"));
  }

  async function refresh() {
    const main = document.querySelector("main");
    if (!main || main.dataset.live === "off") return;
    if (busy || typing()) { again = true; return; }
    busy = true;
    try {
      const r = await fetch(location.href, { credentials: "same-origin", headers: { "X-Ops-Live": "1" } });
      const type = r.headers.get("Content-Type") || "";
      if (r.ok && type.startsWith("text/html") && !r.redirected) {
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        const fresh = doc.querySelector("main");
        if (fresh && !typing()) {
          main.replaceWith(fresh);
          document.body.dataset.updated = String(Date.now());
        }
      }
    } catch (e) {
      // The service is restarting or away: the stream reconnects and says so.
    } finally {
      busy = false;
      if (again) { again = false; setTimeout(refresh, 1000); }
    }
  }

  if (!window.EventSource) return;
  const source = new EventSource("/ops/events");
  source.addEventListener("open", () => { if (live) live.className = "live on"; });
  source.addEventListener("error", () => { if (live) live.className = "live off"; });
  source.addEventListener("changed", refresh);
  document.addEventListener("focusout", () => { if (again && !typing()) { again = false; refresh(); } });
})();
