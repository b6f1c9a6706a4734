# stor in a container: mount the storage disks and a config, point CONFIG_FILE at it.
#   docker build -t stor .
#   chown -R 8321:8321 /mnt/data*          # the disks belong to the container's user
#   docker run -p 8321:8321 -v /mnt:/mnt -v $PWD/stor.json:/etc/stor.json:ro stor
# STOR_PORT and STOR_WORKERS (and any other `stor serve` variable) change how it serves:
#   docker run -e STOR_PORT=9000 -e STOR_WORKERS=4 -p 9000:9000 ... stor
FROM python:3.11-slim-bookworm

# A fixed UID/GID, so operators can chown the storage disks to it before the first run.
ARG STOR_UID=8321
RUN groupadd --system --gid ${STOR_UID} stor \
 && useradd --system --uid ${STOR_UID} --gid ${STOR_UID} --no-create-home --shell /usr/sbin/nologin stor

WORKDIR /app
# Dependencies first, in a layer of their own: a change to the source does not reinstall them.
# They are installed from the list in pyproject.toml, not by building a stub of the package: a
# stub's build leaves build/lib/stor/ behind, newer than the source copied next, and setuptools
# then keeps the stub's files (the image said it was stor 0.0.0). Nothing is built here.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > requirements.txt \
 && pip install --no-cache-dir --requirement requirements.txt && rm requirements.txt
COPY README.md LICENSE ./
COPY stor ./stor
RUN pip install --no-cache-dir --no-deps . && rm -rf build stor.egg-info

ENV CONFIG_FILE=/etc/stor.json
# `stor serve` reads these (as --port and --workers); the healthcheck probes the same port.
ENV STOR_PORT=8321 STOR_WORKERS=2
EXPOSE 8321
USER stor
# Liveness only: /healthz touches no disk (a load balancer probes /readyz, see docs/deployment.md).
# It asks the port `stor serve` listens on (STOR_PORT), over TLS when STOR_SSL_CERTFILE is set.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os, ssl, sys, urllib.request; \
    tls = bool(os.environ.get('STOR_SSL_CERTFILE')); \
    url = ('https' if tls else 'http') + '://127.0.0.1:' + (os.environ.get('STOR_PORT') or '8321') + '/healthz'; \
    context = ssl._create_unverified_context() if tls else None; \
    sys.exit(urllib.request.urlopen(url, timeout=2, context=context).status != 200)"
CMD ["stor", "serve", "--host", "0.0.0.0"]
