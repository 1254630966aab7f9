"""mmsmall/processing."""
