"""Training and evaluating ranking heads on a user's labels."""
