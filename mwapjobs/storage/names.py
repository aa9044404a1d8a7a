"""Every collection mwapjobs touches, named once.

mwapjobs' own collections carry the `mwapjobs_` prefix, so they stand apart from the
backend's; the MWAP backend's are read (and, for integrations, updated) as the
backend writes them (../shared/mwap-data-model.md).
"""

from __future__ import annotations

# mwapjobs' own
RUNS = "mwapjobs_runs"  # one document per job run: the engine's truth
QUEUES = "mwapjobs_queues"  # per queue: paused, finished counters
THROUGHPUT = "mwapjobs_throughput"  # runs finished per minute and queue, for a day or two
SCHEDULER_JOBS = "mwapjobs_scheduler_jobs"  # APScheduler's job store: signed repeat triggers
SCHEDULER_QUARANTINE = "mwapjobs_scheduler_quarantine"  # what the job store refused to read
INTEGRATION_STATE = "mwapjobs_integrations"  # our notes per integration (health, refusals)
NOTIFICATIONS = "mwapjobs_notifications"  # tenant-owner notifications, until delivered
PROVIDER_STATE = "mwapjobs_providers"  # provider holds and the URLs seen last
FILE_INDEX = "mwapjobs_file_index"  # per project: index summary, cursor, a pass in progress
FILE_WALK = "mwapjobs_file_walk"  # folders a Google Drive walk has still to list
ALERT_HISTORY = "mwapjobs_alert_history"  # every FIRING and RESOLVED sent, for the record
MAINTENANCE_STATE = "mwapjobs_maintenance"  # upkeep's notes (what it said once, where it stopped)
LEASES = "mwapjobs_leases"  # who leads (one document per lease name)
ALERT_STATE = "mwapjobs_alerts"  # what operators were told, shared by every instance
CHANGE_STREAMS = "mwapjobs_change_streams"  # where discovery's change streams resume
OWNER_CONTACTS = "mwapjobs_owner_contacts"  # tenant owners' addresses from Auth0, until they expire
ANALYTICS_DAILY = "mwapjobs_analytics_daily"  # a snapshot per tenant and day, and the platform's
ANALYTICS_ACTIVITY = "mwapjobs_analytics_activity"  # refreshes per tenant and day, as they happen

# The MWAP backend's
INTEGRATIONS = "cloudProviderIntegrations"
PROVIDERS = "cloudProviders"
TENANTS = "tenants"
SUPERADMINS = "superadmins"
PROJECTS = "projects"
# Planned by the backend's docs, written by mwapjobs (jobs/files/); the backend reads it.
VIRTUAL_FILES = "virtualFiles"
