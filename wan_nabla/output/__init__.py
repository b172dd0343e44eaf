"""What a run leaves on disk: MP4 encoding and checks (video.py), atomic files (files.py), safe
names from prompts (naming.py), the sidecar JSON's name and rules (sidecar.py), the MP4 and its
sidecar published as one step (publish.py), and the environment record (environment.py)."""
