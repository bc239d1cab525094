"""Layer 5, matching and resync: pairing two models' groups and putting a suspect back in a reference's order."""
