from django.urls import path

from realtime import api

urlpatterns = [path("ticket", api.TicketCreateApi.as_view(), name="realtime-ticket")]
