"""What every stage leans on: files written whole and read back checked, argument ranges, and stage timings."""
