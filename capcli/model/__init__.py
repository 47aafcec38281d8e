"""The Show-Attend-Tell model: its config, the CNN encoders, soft attention, the decoder's single
step, and the model file that holds them all."""
