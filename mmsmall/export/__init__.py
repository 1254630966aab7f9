"""mmsmall/export."""
