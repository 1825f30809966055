from django.urls import URLPattern, URLResolver, path

from vmcontrol import api

urlpatterns: list[URLPattern | URLResolver] = [
    path("vms", api.VmListApi.as_view(), name="vmcontrol-vms"),
    path("vms/<id:vm_id>", api.VmDetailApi.as_view(), name="vmcontrol-vm"),
    path("vms/<id:vm_id>/logout", api.VmLogoutApi.as_view(), name="vmcontrol-vm-logout"),
    path(
        "vms/<id:vm_id>/rotate-token",
        api.VmTokenRotateApi.as_view(),
        name="vmcontrol-vm-rotate-token",
    ),
    path(
        "vms/<id:vm_id>/revoke-token",
        api.VmTokenRevokeApi.as_view(),
        name="vmcontrol-vm-revoke-token",
    ),
    path("vms/<id:vm_id>/commands", api.VmCommandListApi.as_view(), name="vmcontrol-commands"),
    path("disks", api.DiskListApi.as_view(), name="vmcontrol-disks"),
]
