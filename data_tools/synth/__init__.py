"""data_tools/synth."""
