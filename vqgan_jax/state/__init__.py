"""Training states of the two stages, outside the trainers so that interop can make them."""
