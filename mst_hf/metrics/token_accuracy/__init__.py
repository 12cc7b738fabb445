"""The `token_accuracy` evaluate module (a package only so that wheels ship it): `evaluate.load(this folder)`."""
