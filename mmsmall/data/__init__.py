"""mmsmall/data."""
