"""mmsmall/train."""
