"""After the network: probabilities into separate objects (instances), and how to choose the method."""
