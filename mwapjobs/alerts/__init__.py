"""Alerting: rules over the run history and the daemon's health, delivered to the log,
Slack-compatible webhooks and email, with a cool-down and a resolve message.

See `rules` (what is checked), `channels` (where it goes) and `notifier`
(`AlertManager`: when it is sent, and tenant-owner notification delivery).
"""

from .channels import Channel, ChannelError, Message
from .notifier import AlertManager, Dispatcher
from .rules import Condition, Rule, default_rules

__all__ = ["AlertManager", "Channel", "ChannelError", "Condition", "Dispatcher", "Message",
           "Rule", "default_rules"]
