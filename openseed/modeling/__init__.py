"""OpenSeeD model parts: backbone, pixel decoder, decoder, text encoder."""
