# syntax=docker/dockerfile:1
# Two images from one file; `serve` is last, so a plain `docker build .` makes it:
#   docker build --target serve -t endcap:serve .   # slim, no torch
#   docker build --target train -t endcap:train .   # adds CPU torch for `endcap train`
# tests/test_deploy.py keeps this file consistent with pyproject.toml, the CLI and
# Settings; hadolint lints it (.hadolint.yaml).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# A fixed numeric uid/gid: Kubernetes `runAsNonRoot` can only verify numeric users.
RUN groupadd --system --gid 10001 endcap \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home endcap

# Build a wheel once; both targets install it. The COPY list is the wheel's
# package list in pyproject.toml (a test checks they agree).
FROM base AS build
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY endcap ./endcap
COPY server ./server
COPY training ./training
COPY benchmarks ./benchmarks
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM base AS train
COPY --from=build /wheels /wheels
# CPU torch first, from the CPU index, so the [train] range never pulls CUDA.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install "$(ls /wheels/endcap-*.whl)[train]" && rm -rf /wheels
USER 10001:10001
ENV ENDCAP_ARTIFACTS=/artifacts
VOLUME ["/artifacts"]
ENTRYPOINT ["endcap"]
CMD ["train", "--out", "/artifacts"]

FROM base AS serve
COPY --from=build /wheels /wheels
# endcap[serve]: numpy, faiss-cpu, grpcio, prometheus-client. No torch.
RUN pip install "$(ls /wheels/endcap-*.whl)[serve]" && rm -rf /wheels
USER 10001:10001
ENV ENDCAP_HOST=0.0.0.0 ENDCAP_PORT=50051 ENDCAP_METRICS_PORT=9100 ENDCAP_ARTIFACTS=/artifacts
EXPOSE 50051 9100
VOLUME ["/artifacts"]
# The gRPC health service, not a TCP probe: NOT_SERVING until the model loads.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["endcap", "health", "--target", "127.0.0.1:50051", "--service", "endcap.v1.Recommender"]
ENTRYPOINT ["endcap"]
CMD ["serve"]
