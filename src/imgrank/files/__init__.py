"""Files imgrank writes: ranking outputs, renames and their journal."""
