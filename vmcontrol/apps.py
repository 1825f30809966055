from django.apps import AppConfig


class VmcontrolConfig(AppConfig):
    name = "vmcontrol"
    verbose_name = "VM control plane"
