"""Names vulture cannot see used: each is reached by name from outside a Python call (Django,
DRF, Channels, settings, templates, JSON keys). Reviewed by hand; `make lint` runs vulture with
this file (pyproject [tool.vulture]). Add a name here only with the reason it is alive."""
# ruff: noqa: B018, F821

# Model fields: columns written by the ORM or SQL, read by the admin, the API or queries
_.authorized_at  # vmcontrol/services/agent_events.py
_.current_session_id  # vmcontrol/services/agent_events.py
_.finished_at  # betting/services/events.py
_.rotated_at  # docbot/services/accounts.py
_.stored_at  # docbot/services/ingest.py
_.created_by  # realtime/models.py, vmcontrol/models.py
_.current_session_id  # vmcontrol/models.py
_.joined_at  # realtime/models.py
_.received_at  # docbot/models.py, warehouse/models.py
_.registered_by  # vmcontrol/models.py
_.renewed_at  # vmcontrol/models.py
_.rotated_at  # docbot/models.py
_.settled_at  # betting/models.py
_.singleton  # docbot/models.py
_.stored_at  # docbot/models.py
_.used_at  # realtime/models.py

# Serializer fields and TypedDict keys: part of a REST answer or a read shape, read by key
_.arrived_at  # warehouse/api.py, warehouse/read_cache.py
_.authorized_at  # vmcontrol/api.py, vmcontrol/models.py
_.departed_at  # warehouse/api.py, warehouse/read_cache.py
_.document_count  # docbot/api.py, docbot/bot/backend.py
_.elapsed_seconds  # warehouse/api.py, warehouse/read_cache.py
_.ended_at  # vmcontrol/api.py, vmcontrol/models.py
_.expires_in  # realtime/api.py
_.finished_at  # betting/models.py, vmcontrol/api.py, vmcontrol/models.py
_.potential_payout  # betting/api.py, betting/models.py
_.q  # docbot/api.py
_.quantity_difference  # warehouse/api.py, warehouse/read_cache.py
_.quantity_received  # warehouse/api.py, warehouse/read_cache.py
_.quantity_sent  # warehouse/api.py, warehouse/read_cache.py
_.recorded_at  # warehouse/api.py, warehouse/models.py
_.reset_required  # realtime/selectors.py
_.sessions  # vmcontrol/api.py
_.short  # warehouse/api.py, warehouse/read_cache.py
_.telegram_file_id  # docbot/api.py, docbot/bot/backend.py, docbot/models.py
_.token_revoked  # vmcontrol/api.py
_.ts  # realtime/api.py, realtime/selectors.py
_.type_name  # docbot/api.py, docbot/bot/backend.py
_.vm_name  # vmcontrol/api.py
_.last_seen_at  # vmcontrol/api.py, vmcontrol/models.py (REST answer; vmctl reads it by key)

# TextChoices members: stored by value, compared as strings
_.AUTH_TIMEOUT  # vmcontrol/models.py
_.BYE  # vmcontrol/models.py
_.CLOSED  # vmcontrol/models.py
_.CONFLICT  # warehouse/models.py
_.HEARTBEAT_TIMEOUT  # vmcontrol/models.py
_.IDLE_UNAUTHENTICATED  # vmcontrol/models.py
_.INSUFFICIENT_STOCK  # warehouse/models.py
_.LEASE_LOST  # vmcontrol/models.py
_.MALFORMED  # warehouse/models.py
_.PROTOCOL_ERROR  # vmcontrol/models.py
_.REPLACED  # vmcontrol/models.py
_.SERVER_ERROR  # vmcontrol/models.py
_.SERVER_SHUTDOWN  # vmcontrol/models.py

# Framework hooks reached by name (Django admin, DRF, Channels, asyncio, uvicorn, kombu)
_._has_been_logged  # common/middleware.py (Django log_response marker)
_._put  # warehouse/queue.py (kombu Channel override)
_.allow_request  # warehouse/api.py (DRF throttle)
_.capture_signals  # common/management/commands/runall.py (uvicorn.Server hook)
_.connection_lost  # vmcontrol/server.py (asyncio.Protocol)
_.connection_made  # vmcontrol/server.py (asyncio.Protocol)
_.data_received  # vmcontrol/server.py (asyncio.Protocol)
_.get_permissions  # betting/api.py (DRF APIView)
_.get_token_revoked  # vmcontrol/api.py (DRF SerializerMethodField)
_.lookups  # vmcontrol/admin.py (admin SimpleListFilter)
_.changeform_view  # vmcontrol/admin.py (ModelAdmin: add and change views)
_.get_fields  # vmcontrol/admin.py (ModelAdmin)
_.get_inlines  # vmcontrol/admin.py (ModelAdmin)
_.save_related  # vmcontrol/admin.py (ModelAdmin write hook, calls the services)
_.widget  # vmcontrol/admin.py (Django form field class attribute)
_.new_objects  # vmcontrol/admin.py (formset attributes the admin's change message reads)
_.changed_objects  # vmcontrol/admin.py (same)
_.deleted_objects  # vmcontrol/admin.py (same)
_.recent_sessions  # vmcontrol/api.py (read by the serializer (source=))
_.should_exit  # common/management/commands/runall.py (uvicorn.Server attribute)
_.vm_command  # vmcontrol/consumers.py (Channels handler for `vm.command`)
_.vm_replaced  # vmcontrol/consumers.py (Channels handler for `vm.replaced`)
_.change_form_template  # warehouse/admin.py
_.channel_layer_alias  # realtime/consumers.py
_.max_num  # vmcontrol/admin.py
_.parameter_name  # vmcontrol/admin.py
_.show_full_result_count  # warehouse/admin.py
_.delete_queryset  # docbot/admin.py (ModelAdmin write hook: bulk delete through the services)
_.do_process_update  # docbot/bot/application.py (python-telegram-bot BaseUpdateProcessor hook)

# Subcommands dispatched by name
_.do_disks  # vmcontrol/management/commands/vmctl.py (vmctl: getattr(self, "do_" + action))
_.do_list  # vmcontrol/management/commands/vmctl.py (vmctl: getattr(self, "do_" + action))
_.do_logout  # vmcontrol/management/commands/vmctl.py (vmctl: getattr(self, "do_" + action))
_.do_register  # vmcontrol/management/commands/vmctl.py (vmctl: getattr(self, "do_" + action))
_.do_revoke_token  # vmcontrol/management/commands/vmctl.py (vmctl: getattr(self, "do_" + action))
_.do_rotate_token  # vmcontrol/management/commands/vmctl.py (vmctl: getattr(self, "do_" + action))
_.do_update  # vmcontrol/management/commands/vmctl.py (vmctl: getattr(self, "do_" + action))

# Referenced by dotted path from settings or URLconf
_.exception_handler  # common/api.py (REST_FRAMEWORK EXCEPTION_HANDLER)
_.json_bad_request  # common/api.py
_.json_not_found  # common/api.py
_.json_permission_denied  # common/api.py
_.json_server_error  # common/api.py
_.login_lockout_response  # common/api.py

# Used only by tests (kept public on purpose)
_.LENIENT_DRF_FIELDS  # common/fields.py
_.reset_for_tests  # docbot/runtime.py

# Read by the framework (Channels' consumer attributes)
_.groups  # realtime/consumers.py
_._class  # common/cache.py (Django's RedisCache builds its client from it)
# Console sample shapes (common/console.py, common/console_api.py), read by key
_.cells  # common/console.py, common/console_api.py
_.tables  # common/console.py, common/console_api.py
_.ws  # common/console_api.py (the snapshot answer)
# Celery signal receivers, connected by decorator
_worker_heartbeat  # config/celery.py
_worker_heartbeat_stop  # config/celery.py
_beat_heartbeat  # config/celery.py
_.index_template  # common/apps.py (Django admin reads it)
