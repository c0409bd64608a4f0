// Renders the service's own OpenAPI document with the vendored Swagger UI.  Relative
// URLs, so that the page works behind a proxy that mounts the service under a prefix.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // No call to the public validator service: the page talks to this service only.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
