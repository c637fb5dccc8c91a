# Image for the docker-compose demo: both services (source and destination) run it.
#
# No registry is reachable, so the base is a local image that
# scripts/make-base-image.sh builds with debootstrap (Debian bookworm, whose
# python3 is 3.11, the Python the host wheels are built for). Pip inside the
# image has neither a CA bundle nor a network: the project and its
# dependencies arrive as wheels built on the host (scripts/docker-demo puts
# them in dist/wheels/) and are installed offline.
ARG BASE_IMAGE=uffd-migrate-base:local
FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/uffd-migrate \
    PATH=/opt/uffd-migrate/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_INDEX=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# A venv, because Debian's pip refuses to install into the system Python
# (PEP 668, "externally managed"). Its own layer, so rebuilding the wheels
# does not redo it.
RUN python3 -m venv /opt/uffd-migrate

COPY dist/wheels/ /tmp/wheels/
RUN pip install --no-index --find-links /tmp/wheels --no-cache-dir uffd-migrate \
    && rm -rf /tmp/wheels \
    && migrate-src --help >/dev/null \
    && migrate-dst --help >/dev/null

WORKDIR /run/uffd-migrate
CMD ["migrate-src", "--help"]
