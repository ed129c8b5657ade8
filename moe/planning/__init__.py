"""The inference planner of Pope et al. 2022: time and memory per serving layout for a
model shape on a machine. Plain arithmetic: importing it imports no torch."""
