from prox24_lightning.command import main

main()
