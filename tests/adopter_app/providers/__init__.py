"""The adopting app's own ``providers`` package: the library must neither hide nor shadow it."""

PROVIDER = "the adopter's own providers package"
