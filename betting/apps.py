from django.apps import AppConfig


class BettingConfig(AppConfig):
    name = "betting"
    verbose_name = "Betting: line provider and bet maker"
