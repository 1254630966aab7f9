"""mmsmall/model."""
