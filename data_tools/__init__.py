"""data_tools."""
