# The local Python base: the Debian base made by scripts/images.sh (debootstrap, then
# `docker import`) plus Debian's python3 and venv. Only for machines that cannot pull
# python:3.12-slim; the product Dockerfiles take it as `--build-arg BASE=...`.
ARG DEBIAN=agentbox-base/debian:bookworm
FROM ${DEBIAN}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
