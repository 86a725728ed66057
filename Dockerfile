# One image, three entry points: tilehopper-operator, tilehopper-generator, tilehopper-consumer.
# The chart's operator Deployment and the pod templates the operator writes set `command`.
#
#   docker build -t tilehopper:0.1.0 .
#   kind load docker-image tilehopper:0.1.0 --name tilehopper

# Pinned by tag: the Python the project is tested with (pyproject: >=3.11,<3.12).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies are pinned in pyproject.toml; a wheel of the project (not an editable install)
# keeps the sources out of the final image.
COPY pyproject.toml ./
COPY tilehopper/ tilehopper/
COPY operator/ operator/
COPY consumer/ consumer/
COPY generator/ generator/
COPY ami/ ami/
COPY bench/ bench/
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels tilehopper \
    && rm -rf /wheels \
    && groupadd --gid 10001 tilehopper \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tilehopper \
    && mkdir -p /tiles && chown 10001:10001 /tiles
# A consumer's default tiles folder is ./tiles: from / that is /tiles, where pods mount the volume.
WORKDIR /
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
CMD ["tilehopper-operator"]
