"""What a run leaves on disk: MP4 encoding and checks (video.py), atomic files (files.py), safe
names from prompts (naming.py), and the sidecar JSON published with every video (sidecar.py)."""
