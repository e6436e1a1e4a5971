from lightning_maml.cli import main

main()
