# One image for every Quintet process; docker-compose.yml picks the command per service.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 \
    PATH="/app/.venv/bin:$PATH"
RUN pip install --no-cache-dir "uv>=0.5,<1" \
    && useradd --create-home --uid 10001 quintet
WORKDIR /app
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY . .
RUN DJANGO_DEBUG=false DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput -v 0 \
    && mkdir -p var && chown -R quintet var && chmod +x docker/entrypoint.sh
USER quintet
EXPOSE 8000 8001 9100 50051
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["granian", "--interface", "wsgi", "config.wsgi:application", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--blocking-threads", "2", "--no-ws"]
