# textgen: text-generation + embedding HTTP service.
#
# CPU image (default):      docker build -t textgen .
# CPU torch from a registry: docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t textgen .
# CUDA image:               docker build --build-arg TORCH_VARIANT=cu126 -t textgen:cuda .
#                           (or --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126; pick an
#                           index that publishes TORCH_SPEC; the CUDA runtime comes inside the torch wheels,
#                           so the base stays python:3.11-slim and the host only needs the NVIDIA driver)
# Local wheels:             buildah bud -v /opt/wheels:/opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels ...
#
# The base only needs `python3` (3.11+) with the venv module: python:3.11-slim, or a Debian bookworm rootfs
# with python3 + python3-venv (scripts/container-smoke.sh builds one with debootstrap).
#
# Install steps are the Makefile's `install` rule, in the same order: torch first (pinned, from the index
# chosen here), then the project with the [train] extra (not editable, no dev extra).

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ARG TORCH_SPEC=torch==2.13.0
# Where pip finds torch. TORCH_INDEX_URL wins; else TORCH_VARIANT (cpu, cu126, ...) names a PyTorch index;
# else torch comes from the default index plus PIP_FIND_LINKS (a directory or URL holding the wheel).
ARG TORCH_INDEX_URL=""
ARG TORCH_VARIANT=""
ARG PIP_FIND_LINKS=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
# CA bundle for a TLS-intercepting proxy in front of the package index (a path mounted into the build).
ARG PIP_CERT=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1

# A virtualenv rather than the base's pip: works whether or not the base ships pip, and is copied whole
# into the runtime stage.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --upgrade pip

# 1) torch, pinned, before the project so pip never resolves a bare `torch` to the multi-GB CUDA build.
#    Its own layer: source edits do not reinstall it.
RUN set -eu; \
    index="${TORCH_INDEX_URL}"; \
    if [ -z "$index" ] && [ -n "${TORCH_VARIANT}" ]; then index="https://download.pytorch.org/whl/${TORCH_VARIANT}"; fi; \
    if [ -n "$index" ]; then \
        echo "torch: ${TORCH_SPEC} from $index"; \
        /opt/venv/bin/pip install --quiet --index-url "$index" "${TORCH_SPEC}"; \
    else \
        echo "torch: ${TORCH_SPEC} from the default index${PIP_FIND_LINKS:+ + find-links ${PIP_FIND_LINKS}}"; \
        /opt/venv/bin/pip install --quiet "${TORCH_SPEC}"; \
    fi; \
    /opt/venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 2) the project, [train] extra, not editable. pip keeps the torch installed above.
WORKDIR /src
COPY . /src
RUN /opt/venv/bin/pip install --quiet ".[train]" \
 && /opt/venv/bin/textgen --help > /dev/null

# 3) the CPU kernels (fp32 and int8/int4 GEMMs, paged decode attention: app/engine/models/invariant_gemm.py),
#    compiled here with g++ and ninja, which stay out of the runtime image: it imports the module built
#    here, found by the stamp of its sources. Without AVX-512 on the build machine, or where they do not
#    build, the server runs its library fallbacks (and says so at startup).
ENV TORCH_EXTENSIONS_DIR=/opt/torch_extensions
RUN set -eu; \
    if ! command -v g++ >/dev/null || ! command -v ninja >/dev/null; then \
        apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ ninja-build >/dev/null; \
    fi; \
    mkdir -p /opt/torch_extensions; \
    /opt/venv/bin/python -c "from app.engine.models import invariant_gemm as g; print('CPU kernels:', 'built' if g.kernel() else 'unavailable (library fallbacks)')"

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

# Non-root user; the cache directory (HF cache + textgen's demo model) belongs to it and is a volume.
# The deploy/k8s manifests use the same numeric ids (runAsUser/fsGroup 10001).
RUN groupadd --system --gid 10001 textgen \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/textgen --create-home \
        --shell /usr/sbin/nologin textgen \
 && mkdir -p /var/cache/textgen \
 && chown 10001:10001 /var/cache/textgen

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/torch_extensions /opt/torch_extensions

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/var/cache/textgen \
    HF_HOME=/var/cache/textgen/huggingface \
    TOKENIZERS_PARALLELISM=false \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
    TEXTGEN_HOST=0.0.0.0 \
    TEXTGEN_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

VOLUME ["/var/cache/textgen"]
WORKDIR /home/textgen
USER 10001:10001
EXPOSE 8000

# /health is liveness: 200 once the model is loaded and the engine runs. Without TEXTGEN_MODEL the first
# start builds the offline demo model into the cache volume (~3 min on 2 CPUs), hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('TEXTGEN_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status == 200 else 1)"]

# The app drains in-flight requests on SIGTERM (TEXTGEN_SHUTDOWN_TIMEOUT), so it runs as PID 1 directly.
STOPSIGNAL SIGTERM
CMD ["textgen", "serve"]
