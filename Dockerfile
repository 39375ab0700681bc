# Fermi Infer for NVIDIA hosts: `docker run --gpus all -p 8000:8000 fermi-infer`.
# The base image brings CUDA and a CUDA build of PyTorch; the package is installed on top
# with its serving dependencies (HTTP server, gRPC), so torch is not downloaded again.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# torch.compile's Triton kernels build a small C launcher on first use: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fermi
COPY pyproject.toml README.md LICENSE ./
COPY fermi ./fermi
COPY export ./export
RUN pip install --no-cache-dir . && pip check

# Run as an ordinary user. Model downloads (HF_HOME) and compiled-kernel caches (Fermi's
# compile artefacts, Inductor, Triton) all live under one volume, so a restarted container
# skips both the download and the compile.
RUN useradd --create-home --uid 1000 fermi
USER fermi
ENV HF_HOME=/home/fermi/.cache/huggingface \
    FERMI_COMPILE_CACHE=/home/fermi/.cache/fermi/compile \
    TORCHINDUCTOR_CACHE_DIR=/home/fermi/.cache/torchinductor \
    TRITON_CACHE_DIR=/home/fermi/.cache/triton \
    PYTHONUNBUFFERED=1
RUN mkdir -p /home/fermi/.cache/huggingface
VOLUME ["/home/fermi/.cache"]

# 8000: OpenAI-compatible HTTP (`fermi serve`); 50051: gRPC (`fermi grpc`).
EXPOSE 8000 50051

# The first start downloads and compiles; give it time before counting failures.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1

ENTRYPOINT ["fermi"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
