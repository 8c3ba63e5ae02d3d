"""Operating a backup: checking it (:mod:`~replicator.ops.verify`), and, in sibling modules,
drills and status. Import what you need from the submodules; nothing is re-exported here."""
