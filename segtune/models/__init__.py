"""Pure torch / HF / PEFT model building: no Lightning here."""
