from django.urls import URLPattern, URLResolver, path

from docbot import api

urlpatterns: list[URLPattern | URLResolver] = [
    path("types/", api.TypeListCreateApi.as_view(), name="docbot-types"),
    path("types/<id:type_id>", api.TypeDetailApi.as_view(), name="docbot-type"),
    path("received-files/", api.ReceivedFileCreateApi.as_view(), name="docbot-received-files"),
    path("documents/", api.DocumentListCreateApi.as_view(), name="docbot-documents"),
    path("documents/<id:document_id>", api.DocumentDetailApi.as_view(), name="docbot-document"),
    path(
        "documents/<id:document_id>/share",
        api.DocumentShareApi.as_view(),
        name="docbot-document-share",
    ),
]
