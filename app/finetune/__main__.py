import sys

from app.finetune.cli import main

sys.exit(main())
