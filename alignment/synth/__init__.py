"""Capability data synthesis (Baichuan Alignment report, section 4): recipes that build SFT and preference data per
capability against any OpenAI-compatible teacher, every item verified before it is kept (alignment.stages.synth)."""
