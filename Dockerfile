# The event stream's image: web, relay, Celery worker and beat all run from it
# (see docker-compose.yml).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=plane.settings

WORKDIR /app
COPY pyproject.toml README.md manage.py celery_app.py ./
COPY event_stream ./event_stream
COPY plane ./plane
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 app
USER app

EXPOSE 8000
CMD ["python", "manage.py", "runserver", "0.0.0.0:8000"]
