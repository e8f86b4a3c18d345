"""The read side: queries over the projections' views, with read-your-writes."""
