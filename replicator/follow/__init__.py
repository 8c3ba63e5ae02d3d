"""Follow mode: replicas that tail the backup (see :mod:`.runner` and :mod:`.replica`)."""

from __future__ import annotations

from replicator.follow.replica import Position, Replica, open_replica
from replicator.follow.runner import Follower, FollowStats, follower_status

__all__ = ["FollowStats", "Follower", "Position", "Replica", "follower_status", "open_replica"]
