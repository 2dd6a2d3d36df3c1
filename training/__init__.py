"""Offline jobs: data, SCFT, embedding, RAT, evaluation, export. Imports models/, never service/."""
