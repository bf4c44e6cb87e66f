"""Long runs under faults and load: wrong bytes never served, no leaks, recovery."""
