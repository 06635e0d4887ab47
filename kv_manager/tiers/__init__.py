"""KV tiers below a worker's device pool: host memory and disk, behind one two-phase contract
(`kv_manager.tiers.base`). See each module for who owns what."""

from kv_manager.tiers.base import BlockKey, LoadJob, StoreJob, TierError
from kv_manager.tiers.disk import DiskTier
from kv_manager.tiers.host import HostTier

__all__ = ["BlockKey", "DiskTier", "HostTier", "LoadJob", "StoreJob", "TierError"]
