"""Evaluation: frozen features, linear / attentive probes, k-NN, embeddings export."""
