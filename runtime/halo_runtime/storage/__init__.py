"""The storage shell: memory-mapped shards, the group cache and streaming device compute for
devices whose memory is smaller than their shard (the residency plan is `core.residency`)."""
